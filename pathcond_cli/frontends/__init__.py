"""Front ends: one per container format, each producing a :class:`~pathcond_cli.frontends.base.LoadedModel`."""
