"""placeholder: filled by the diagnose command"""

from __future__ import annotations
