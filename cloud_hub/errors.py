"""The hub's one exception base: every error of the hub says its exit code (:mod:`edge_agent.exits`).

``cloud-hub``'s commands turn any :class:`edge_agent.exits.Failure` into one line and its code in one
place (:func:`cloud_hub.cli.common.errors`).
"""

from __future__ import annotations

from edge_agent import exits


class HubError(exits.Failure):
    """Base of the hub's own errors (exit 1 unless a subclass says otherwise)."""
