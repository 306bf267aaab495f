"""`make heal-bench`: mendloop's fix rate on the example services' fault scenarios (bench/heal/scenarios.py),
judged by each scenario's own probe of the service. See bench/heal/__main__.py."""
