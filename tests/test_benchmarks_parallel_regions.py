"""benchmarks/parallel_regions.py runs and prints every case from both threads."""
from benchmarks import parallel_regions


def test_every_case_is_timed_on_both_threads(capsys):
    parallel_regions.main(["--calls", "20"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("machine:") and "another thread" in lines[1]
    rows = lines[2:]
    assert len(rows) == 4 and all(row.rstrip().endswith("x") for row in rows), rows
