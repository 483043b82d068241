"""The training runtime: schedules (data), the local objectives, executors, the fit loop and the
gradient-fidelity instrument. Import from the submodules."""

__all__: list[str] = []
