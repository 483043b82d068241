"""The compiler passes, in order: capture (and guards), graph, partition, lower, hierarchy, couplers,
heads. Import from the submodules."""

__all__: list[str] = []
