"""sms-router: SMPP and HTTP in, per-country carrier SMPP out, receipts back."""

from .accel import install_guard as _install_guard

__version__ = "0.1.0"

# Before any compiled module is imported: a stale in-place build (source edited
# after compiling) loads from source instead (router/accel.py).
_install_guard()
