"""Convert checkpoints to Sinkhorn attention, write their model cards and share them on the Hub.

:mod:`.convert` (checkpoint → Sinkhorn checkpoint), :mod:`.card` (run directory → README.md model card),
:mod:`.push` (run directory → Hub repository).
"""

from .card import CardError, build_card, load_results, write_card
from .convert import ConversionError, ConversionReport, convert
from .push import PushError, PushReport, push, select_files

__all__ = [
    "CardError",
    "ConversionError",
    "ConversionReport",
    "PushError",
    "PushReport",
    "build_card",
    "convert",
    "load_results",
    "push",
    "select_files",
    "write_card",
]
