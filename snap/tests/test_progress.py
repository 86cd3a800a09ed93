import logging

from shardline.progress import logged_progress


def test_progress_logs_the_end_and_at_most_every_interval(caplog):
    logger = logging.getLogger("progress-test")
    with caplog.at_level(logging.INFO, logger="progress-test"):
        items = list(logged_progress(range(5), 5, "loading layers", logger, every_s=3600))
    assert items == [0, 1, 2, 3, 4]
    assert [r.getMessage() for r in caplog.records] == ["loading layers: 5/5"]
    assert caplog.records[0].elapsed_s >= 0
