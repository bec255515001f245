"""Speed benchmarks of chiasm run from the repository (not part of the installed package)."""
