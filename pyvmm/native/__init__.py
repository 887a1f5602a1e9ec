"""Small compiled helpers (C beside their Python modules), built for each machine by
`python -m pyvmm.native`; see helpers.py."""
