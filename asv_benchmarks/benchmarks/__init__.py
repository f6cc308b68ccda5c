"""asv benchmarks of kflats (see ``asv_benchmarks/asv.conf.json``)."""
