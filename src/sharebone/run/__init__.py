"""Running sharebone: the console scripts (``cli``), what a training or an evaluation does
(``train``, ``eval``), turning a composed config into a run's parts (``build``), run directories
and their records (``run_dir``), sweeps, DDP ranks (``distributed``) and the process set-up
(``environment``). The top layer: nothing below imports it."""
