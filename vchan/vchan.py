"""Deprecated: the blocking :class:`~vchan.Vchan` is in :mod:`vchan.blocking`.

Import ``vchan.Vchan`` and ``vchan.own_domid`` from the package (or from
:mod:`vchan.blocking`); this module only keeps ``vchan.vchan`` importable.
"""

from __future__ import annotations

import warnings

from .blocking import Vchan, own_domid

__all__ = ["Vchan", "own_domid"]

warnings.warn("vchan.vchan is deprecated: import Vchan and own_domid from vchan "
              "(or vchan.blocking)", DeprecationWarning, stacklevel=2)
