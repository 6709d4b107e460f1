"""placeholder: filled by the dashboard command"""

from __future__ import annotations
