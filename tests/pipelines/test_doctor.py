"""`lensforge doctor`: missing weights are named with their path, a loopback endpoint is reachable or not, a cluster
address is probed without starting Ray, and only `missing` rows fail the exit code. Loopback only."""

import socket

import pytest

from captioning.config import CaptionConfig
from captioning.endpoint import start_endpoint
from pipelines import cli, doctor
from pipelines.doctor import MISSING, OK, WARNING, Check


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_name(rows):
    return {r.name: r for r in rows}


def test_missing_weights_are_reported_with_their_path(tmp_path):
    vae = tmp_path / "flux2-vae"
    hf = tmp_path / "bert"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"precompute:\n  codec: flux2:{vae}\n  text_encoder: gpt-oss:{tmp_path}/gpt-oss@5,11\n"
                      f"train:\n  codec: pixel\n  text_encoder: hf:{hf}@1\n"
                      f"curate:\n  models: {{clip_model: ViT-B-32, clip_weights: {tmp_path}/clip.bin}}\n")
    sections, rows = doctor.load_sections(str(config), [])
    assert set(sections) == {"precompute", "train", "curate"} and rows[0].status == OK
    rows = by_name(doctor.check_config(sections, offline=True))
    assert rows["precompute.codec"].status == MISSING and str(vae) in rows["precompute.codec"].detail
    assert rows["precompute.text_encoder"].status == MISSING
    assert f"{tmp_path}/gpt-oss" in rows["precompute.text_encoder"].detail
    clip = rows["curate.models.clip_weights"]
    assert clip.status == MISSING and "clip.bin" in clip.detail
    assert rows["train.codec"].status == OK and rows["train.text_encoder"].status == OK
    assert rows["train.text_encoder"].detail.startswith(str(hf))
    # precompute and train disagree: training would refuse those shards
    assert any(r.status == WARNING and "precompute's" in r.detail for r in rows.values())


def test_an_invalid_section_is_missing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  preset: no-such-preset\ncaption:\n  concurrency: 0\n")
    _, rows = doctor.load_sections(str(config), [])
    assert [r.status for r in rows] == [MISSING, MISSING]
    assert "no-such-preset" in rows[0].detail and "caption.concurrency" in rows[1].detail


def test_local_endpoint_reachable_and_closed_port_unreachable():
    handle, base_url = start_endpoint(host="127.0.0.1", port=0)
    try:
        served = doctor.check_endpoint(CaptionConfig(base_url=base_url, model="gpt-4.1-mini"), timeout_s=5)
        unknown = doctor.check_endpoint(CaptionConfig(base_url=base_url, model="no-such-model"), timeout_s=5)
    finally:
        handle.stop()
    assert served.status == OK and "serves gpt-4.1-mini" in served.detail
    assert unknown.status == WARNING and "no-such-model" in unknown.detail
    closed = doctor.check_endpoint(CaptionConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", model="m"),
                                   timeout_s=2)
    assert closed.status == MISSING and "unreachable" in closed.detail


def test_endpoint_that_refuses_the_key(monkeypatch):
    monkeypatch.setenv("LF_TEST_KEY", "sk-wrong")
    handle, base_url = start_endpoint(host="127.0.0.1", port=0, api_key="sk-right")
    try:
        row = doctor.check_endpoint(CaptionConfig(base_url=base_url, model="m", api_key_env="LF_TEST_KEY"))
    finally:
        handle.stop()
    assert row.status == MISSING and "401" in row.detail and "LF_TEST_KEY" in row.fix


def test_offline_contacts_no_remote_address(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"doctor tried to connect: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)  # any attempt fails the test
    monkeypatch.setattr(socket.socket, "connect", refuse)
    row = doctor.check_endpoint(CaptionConfig(model="gpt-4.1"), offline=True)  # api.openai.com: not contacted
    assert row.status == WARNING and "not contacted" in row.detail
    row = doctor.check_ray_cluster("10.0.0.1:6379", offline=True)
    assert row.status == WARNING and "not contacted" in row.detail


def test_ray_cluster_is_probed_not_joined():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert doctor.check_ray_cluster(f"127.0.0.1:{port}").status == OK
        assert doctor.check_ray_cluster(f"ray://127.0.0.1:{port}").status == OK
    assert doctor.check_ray_cluster(f"127.0.0.1:{closed_port()}", timeout_s=2).status == MISSING
    assert doctor.check_ray_cluster("no-port").status == MISSING


def test_img2dataset_importers_set_the_env(tmp_path):
    assert "curation.download" in doctor.img2dataset_importers()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from img2dataset import download\n")
    assert doctor.img2dataset_importers(tmp_path) == ["pkg.bad"]
    row = doctor.check_img2dataset_env(root=tmp_path)
    assert row.status == MISSING and "pkg.bad" in row.detail


def test_disk_and_table(tmp_path):
    assert doctor.check_disk(tmp_path / "not-yet").status in (OK, WARNING)  # the nearest existing parent
    assert doctor.check_disk(tmp_path, budget_gb=1e12).status == WARNING
    rows = [Check("a", OK, "fine"), Check("b", WARNING, "hmm", "do this"), Check("c", MISSING, "gone", "do that")]
    table = doctor.format_table(rows)
    assert "→ do this" in table and "→ do that" in table and "1 ok, 1 warning(s), 1 missing" in table
    assert doctor.exit_code(rows) == 1 and doctor.exit_code(rows[:2]) == 0


@pytest.mark.parametrize("ok", [True, False])
def test_cli_exit_code(tmp_path, monkeypatch, capsys, ok):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["doctor"])  # the others are not this test's
    monkeypatch.setattr(doctor, "check_img2dataset_env", lambda: Check("img2dataset env", OK, "stub"))
    config = tmp_path / "c.yaml"
    config.write_text("precompute:\n  codec: pixel\n" if ok else f"precompute:\n  codec: flux2:{tmp_path}/vae\n")
    assert cli.main(["doctor", "--config", str(config), "--out", str(tmp_path)]) == (0 if ok else 1)
    assert "precompute.codec" in capsys.readouterr().out


def test_gpu_rows(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    row = doctor.check_gpu(want_bf16=True)
    assert row.status == WARNING and "CPU only" in row.detail and "bf16" in row.fix  # a warning, not an error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    row = doctor.check_gpu(want_bf16=True)
    assert row.status == OK and "2 × CUDA: 2 × NVIDIA H100 80GB HBM3" in row.detail


def test_an_unset_key_for_a_remote_caption_endpoint_is_missing(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LF_TEST_KEY", raising=False)
    row = doctor.check_api_key(CaptionConfig(model="gpt-4.1"))  # api.openai.com by default
    assert row.status == MISSING and "$OPENAI_API_KEY (caption.api_key_env) is unset" in row.detail
    assert "api.openai.com" in row.detail and "export OPENAI_API_KEY" in row.fix
    remote = CaptionConfig(base_url="https://vllm.example.org/v1", model="m", api_key_env="LF_TEST_KEY")
    assert doctor.check_api_key(remote).status == MISSING and "$LF_TEST_KEY" in doctor.check_api_key(remote).detail
    monkeypatch.setenv("LF_TEST_KEY", "sk-secret")
    row = doctor.check_api_key(remote)
    assert row.status == OK and "sk-secret" not in row.detail  # the key itself is never shown
    local = doctor.check_api_key(CaptionConfig(base_url="http://127.0.0.1:8001/v1", model="m"))
    assert local.status == OK and "no key needed" in local.detail


def test_cli_fails_on_an_unset_caption_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["doctor"])
    monkeypatch.setattr(doctor, "check_img2dataset_env", lambda: Check("img2dataset env", OK, "stub"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("caption:\n  model: gpt-4.1\n")  # the OpenAI API: not contacted offline, but it needs the key
    assert cli.main(["doctor", "--config", str(config), "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "missing  caption api key" in out and "$OPENAI_API_KEY (caption.api_key_env) is unset" in out
