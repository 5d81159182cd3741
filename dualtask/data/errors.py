"""How the data modules report their input: `DataError` refuses it, `warn_data` says it was loaded, but not quite
as given. The ground of the data modules, below taskdata.py (the format) and images.py (the image reading), which
both use it; taskdata.py imports both names, so `from dualtask.data.taskdata import DataError` stays valid."""
from __future__ import annotations

import sys


class DataError(ValueError):
    """Bad data input: the message names the path or value and the expected form."""


def warn_data(message: str) -> None:
    """One 'warning: ...' line on stderr: data loaded, but not quite as given."""
    print(f"warning: {message}", file=sys.stderr)
