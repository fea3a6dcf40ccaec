"""Other systems' interfaces and the thesis' names on the workbook's models. Imports the core and the decoding engine;
neither imports it."""
from . import interfaces  # noqa: F401  (attaches the names)
