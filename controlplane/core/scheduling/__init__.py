"""Placement's plugin framework: contracts (``framework``), free-GPU state (``state``) and the
stock filters, scorers, pickers and default profile (``plugins``). The pipeline that runs them,
and the API the reconciler calls, is ``controlplane.core.placement``."""
