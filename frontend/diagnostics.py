"""The spec error and its helpers live in ir/diagnostics.py (passes raise SpecError too, and
must not import the front end); the front end's modules import them from here."""
from ..ir.diagnostics import SpecError, closest, did_you_mean, source_line  # noqa: F401
