"""Looking inside traced programs: what tests assert about the computation itself, not only its numbers."""


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, scan, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from equations(sub)
