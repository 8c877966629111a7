"""Attribution methods, one module per method (build them with ``diffattr.attribution.registry``)."""
