"""Benchmarks: they print figures (percentiles, ratios) measured in one run on this machine.

    python -m reactor.bench emulator|scheduling|sending|faults|all [--quick] [--out DIR]

`all` runs every benchmark and the fault suite at larger sizes and writes `report.json` and
`report.md` to --out (default ./reports).
"""
