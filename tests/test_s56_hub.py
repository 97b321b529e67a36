"""Review s56 (push): what `push` (no WHAT) and `run` push, the dataset then the model, is
checked before anything is sent, so a bad push.model_repo_id or an unfinished model no longer
fails after the whole dataset went up; the push settings' problems are found without the
network; a Hub endpoint that takes the connection and never answers fails the push instead of
hanging it for good; cards name a base model given as a snapshot folder of the Hub cache by its
Hub id, not by the commit hash that is its folder's name."""
from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hubserver import HubServer
from test_push import TOKEN, hub_env, make_model, make_run, push_cmd, run


# --- 1. both pushes checked before the first one ------------------------------------------------

def test_a_bad_model_repo_id_is_refused_before_the_dataset_is_pushed(tmp_path, workdir):
    make_run(workdir, shards=2)
    make_model(workdir)
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "--set", "push.repo_id=org/data",
                         "--set", "push.model_repo_id=org/bad name"), hub_env(hub, tmp_path))
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "push.model_repo_id 'org/bad name' is not a Hub repo id" in p.stderr
        assert hub.state.repos == {}  # nothing created, nothing uploaded
        assert not hub.state.lfs_uploads


def test_an_unfinished_model_is_refused_before_the_dataset_is_pushed(tmp_path, workdir):
    make_run(workdir, shards=1)
    make_model(workdir, done=False)  # SFT stopped while it replaced the model
    with HubServer(token=TOKEN) as hub:
        p = run(push_cmd(workdir, "--set", "push.repo_id=org/data",
                         "--set", "push.model_repo_id=org/labrador"), hub_env(hub, tmp_path))
        assert p.returncode == 1 and "not a finished model" in p.stderr, p.stderr[-3000:]
        assert "`guidealign push respond org/data` pushes the dataset alone" in p.stderr
        assert hub.state.repos == {}


def test_push_settings_problems_are_found_without_the_network(monkeypatch):
    from guidealign.config import load_config
    from guidealign.hub.push import config_problems

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    pcfg = load_config(None, ["push.repo_id=datasets/org/x", "push.model_repo_id=org/a b"]).push
    said = config_problems(pcfg)
    assert len(said) == 2
    assert said[0].startswith("push.repo_id 'datasets/org/x' is not a Hub repo id")
    assert said[1].startswith("push.model_repo_id 'org/a b' is not a Hub repo id")
    assert config_problems(load_config(None, ["push.repo_id=org/x", "push.model_repo_id=lab"]).push) == []
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert config_problems(load_config(None, ["push.repo_id=org/x"]).push) == \
        ["HF_HUB_OFFLINE is set: unset it to push"]


# --- 2. a Hub that never answers ----------------------------------------------------------------

class _MuteAfterCreate(BaseHTTPRequestHandler):
    """A Hub that creates the repo, then takes every other request and never answers it."""
    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def log_message(self, *args):
        pass

    def do_POST(self):
        if self.path.startswith("/api/repos/create"):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = f"http://{self.headers['Host']}/datasets/org/x"
            body = json.dumps({"url": url, "name": "org/x", "id": "org/x"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.release.wait(120)

    do_GET = do_HEAD = do_POST


@contextmanager
def _silent_hub(when: str):
    """The endpoint of a Hub silent from the start (a socket whose backlog the kernel accepts
    into; nothing reads it) or after creating the repo."""
    if when == "from the start":
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        try:
            yield f"http://127.0.0.1:{silent.getsockname()[1]}"
        finally:
            silent.close()  # resets the waiting connections: a hung push ends too
        return
    _MuteAfterCreate.release = threading.Event()  # a fresh one: a set one would answer at once
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MuteAfterCreate)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _MuteAfterCreate.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("when", ["from the start", "after creating the repo"])
def test_a_hub_that_never_answers_fails_the_push_instead_of_hanging(workdir, monkeypatch, when):
    """huggingface_hub's client has no timeout (and repo_info asks for none): an endpoint (a
    proxy, a mirror) that takes the connection and never answers hung `guidealign push` for
    good."""
    import httpx2
    from huggingface_hub.utils import _http

    import guidealign.hub.push as push
    from guidealign.config import load_config

    make_run(workdir, shards=1)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the tests set it (conftest)
    monkeypatch.setattr(push, "HUB_CONNECT_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(push, "HUB_READ_TIMEOUT_S", 1.0, raising=False)
    factory = _http._GLOBAL_CLIENT_FACTORY
    cfg = load_config(None, ["push.repo_id=org/x", "push.max_retries=0"])
    raised: list = []

    def go():
        try:
            push.run_push(cfg, workdir, progress=False)
        except BaseException as e:  # noqa: BLE001 - what the push ended with
            raised.append(e)

    with _silent_hub(when) as endpoint:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(90)  # a guard against the hang this test is about, not a speed check
        hung = t.is_alive()
    t.join(30)
    _http.close_session()
    assert not hung, "the push hung on a Hub that never answers"
    assert raised and isinstance(raised[0], httpx2.TimeoutException), raised
    assert _http._GLOBAL_CLIENT_FACTORY is factory  # huggingface_hub's client as it was


# --- 3. a base model given as a snapshot folder of the Hub cache ------------------------------

SNAPSHOT = "/shared/hf/hub/models--meta-llama--Llama-2-13b-hf/snapshots/01c7f73d771dfac7d292323805ebc428287df4f9"


def test_the_labrador_card_names_a_base_model_given_as_a_cache_snapshot_by_its_hub_id():
    """A base model given as the folder `huggingface-cli download` prints was named by its
    commit hash on the model card, with no base_model metadata to link it."""
    import yaml

    from guidealign.hub.card import model_card

    card = model_card(base_model=SNAPSHOT, data={"datasets": ["respond"]},
                      hyperparameters={"mode": "full"}, metrics={}, mode="full", merged=True)
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "meta-llama/Llama-2-13b-hf"
    assert "of `meta-llama/Llama-2-13b-hf`" in card and "01c7f73d" not in card


def test_cards_name_a_cache_snapshot_by_its_hub_id_and_other_paths_by_their_base_name():
    from guidealign.hub.card import redact

    assert redact({"generator": SNAPSHOT + "/", "sft": "~/.cache/huggingface/hub/models--gpt2/snapshots/abc",
                   "file": SNAPSHOT + "/model.gguf", "own": "/home/alice/models/llama-13b"}) == \
        {"generator": "meta-llama/Llama-2-13b-hf", "sft": "gpt2", "file": "model.gguf", "own": "llama-13b"}
