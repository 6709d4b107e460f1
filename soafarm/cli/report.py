"""placeholder: filled by the report command"""

from __future__ import annotations
