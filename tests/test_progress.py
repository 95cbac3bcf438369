import logging

from gpu_ann.progress import stage


def test_stages_write_plain_log_lines_when_not_on_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr("gpu_ann.progress.on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="gpu_ann"):
        with stage("reading ratings"):
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "reading ratings ..."
    assert messages[1].startswith("reading ratings: done in ") and messages[1].endswith(" s")


def test_stages_show_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr("gpu_ann.progress.on_terminal", lambda: True)
    with stage("splitting"):
        pass
    assert "splitting: " in capsys.readouterr().err
