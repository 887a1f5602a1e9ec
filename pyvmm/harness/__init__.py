"""The build-and-test harness: the suite runner (and, later, the guest kit and test VM)."""
