"""One kit for every HTML report (AutoQuant, QuantAnalyzer, mixed precision): neutral rows in, one
self-contained page out."""

from edgequant.report.page import Column, Page

__all__ = ["Column", "Page"]
