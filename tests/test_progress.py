"""Progress lines of the jobs that are not training (stages/core/progress.py): rate and ETA from a
clock the test drives, a line at most every `seconds`, always one at the end."""

from stages.core.progress import Progress, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_eta_from_the_elapsed_time(capsys):
    clock = Clock()
    p = Progress("[sample]", 1000, "images", seconds=10, clock=clock)
    clock.now += 4
    p.update(100)  # 4 s in: too early for a line
    assert capsys.readouterr().out == ""
    clock.now += 16
    p.update(250)  # 250 images in 20 s: 12.5 images/s, 750 left: 60 s
    assert capsys.readouterr().out == ("[sample] 250/1000 images (25.0%)  images/s 12.5  elapsed 20s  eta 1m00s\n")
    clock.now += 5
    p.update(300)  # 5 s after the last line: none
    assert capsys.readouterr().out == ""
    clock.now += 55
    p.update(1000, "range 2")  # the end always prints
    assert capsys.readouterr().out == (
        "[sample] 1000/1000 images (100.0%)  images/s 12.5  elapsed 1m20s  eta 0s  range 2\n")


def test_no_rate_yet_gives_an_unknown_eta():
    clock = Clock()
    assert Progress("[fid]", 3, "seed ranges", clock=clock).line(0) == (
        "[fid] 0/3 seed ranges (0.0%)  seed ranges/s 0  elapsed 0s  eta ?")


def test_duration():
    assert [duration(s) for s in (0, 59.9, 61, 3600, 3723)] == ["0s", "59s", "1m01s", "1h00m00s", "1h02m03s"]
