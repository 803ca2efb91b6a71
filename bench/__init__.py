"""Side-by-side benchmark of relay and a private Postfix instance on loopback.

`python -m bench` (full) or `python -m bench --quick` (CI smoke test). See
`bench/__main__.py` for the sections; every process and temp dir it starts is
stopped and removed before it returns.
"""
