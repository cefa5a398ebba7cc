"""A loopback stand-in for the Hugging Face Hub: repositories as local folders, served in the hub's URL layout.

Point the real clients at it with HF_ENDPOINT=http://127.0.0.1:<port> (and HF_HUB_OFFLINE=0): `datasets`
and `transformers` then resolve hub ids, read dataset cards, list and download files exactly as they do
against huggingface.co, so a wrong repository, config or split name fails as it would there. Only the
endpoints those clients call are served:

  HEAD/GET /<repo>/resolve/<rev>/<path>                 (models)  file metadata and content
  HEAD/GET /datasets/<repo>/resolve/<rev>/<path>        (datasets)
  GET      /api/<kind>s/<repo>[/revision/<rev>]         repository info (sha, files)
  GET      /api/<kind>s/<repo>/tree/<rev>[/<path>]      a folder listing (recursive on request)
  POST     /api/<kind>s/<repo>/paths-info/<rev>         metadata of given paths
Anything else is a 404 and is recorded in `FakeHub.unserved`, so a test can show what a client wanted.

The builders below write repositories in the hub's layouts: a dataset's parquet files per config and split
with the dataset card's YAML `configs:` pointing at them, and tiny OPT / LLaMA model folders (config.json,
safetensors weights, tokenizer files) with random weights.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

SPLIT_FILE = "{folder}/{split}-00000-of-00001.parquet"  # the hub's parquet conversions' names
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves root/datasets/<org>/<name>/... and root/models/<org>/<name>/... on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.unserved: list[str] = []
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

            def do_POST(self):
                hub._handle(self, body=True)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- routing ---------------------------------------------------------------------------------
    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlparse(request.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.requests.append(f"{request.command} {url.path}")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self._api(request, parts[1][:-1], parts[2:], parse_qs(url.query), body)
        kind = "model"
        if parts[0] == "datasets":
            kind, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(request, kind, "/".join(parts[:2]), "/".join(parts[4:]), body)
        self._missing(request, "EntryNotFound")

    def _repo(self, kind: str, repo_id: str) -> Path | None:
        folder = self.root / f"{kind}s" / repo_id
        return folder if folder.is_dir() else None

    def _resolve(self, request, kind: str, repo_id: str, path: str, body: bool) -> None:
        repo = self._repo(kind, repo_id)
        if repo is None:
            return self._missing(request, "RepoNotFound")
        file = repo / path
        if not file.is_file():
            return self._missing(request, "EntryNotFound", repo_known=True)
        data = file.read_bytes()
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _api(self, request, kind: str, rest: list[str], query: dict, body: bool) -> None:
        repo_id, rest = "/".join(rest[:2]), rest[2:]
        repo = self._repo(kind, repo_id)
        if repo is None:
            return self._missing(request, "RepoNotFound")
        if not rest or rest[0] == "revision":
            files = [{"rfilename": str(p.relative_to(repo))} for p in sorted(repo.rglob("*")) if p.is_file()]
            return self._json(request, {"id": repo_id, "sha": COMMIT, "private": False, "disabled": False,
                                        "gated": False, "siblings": files, "tags": []}, body)
        if rest[0] == "tree":
            folder = repo.joinpath(*rest[2:])
            if not folder.is_dir():
                return self._missing(request, "EntryNotFound", repo_known=True)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
            return self._json(request, [self._entry(repo, p) for p in entries], body)
        if rest[0] == "paths-info":
            length = int(request.headers.get("Content-Length", 0))
            form = parse_qs(request.rfile.read(length).decode())
            payload = json.loads(form["paths"][0]) if "paths" in form and form["paths"][0].startswith("[") \
                else form.get("paths", [])
            found = [repo / p for p in payload if (repo / p).exists()]
            return self._json(request, [self._entry(repo, p) for p in found], body)
        self._missing(request, "EntryNotFound")

    @staticmethod
    def _entry(repo: Path, path: Path) -> dict:
        name = str(path.relative_to(repo))
        if path.is_dir():
            return {"type": "directory", "oid": COMMIT, "path": name, "size": 0}
        data = path.read_bytes()
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}

    @staticmethod
    def _json(request, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _missing(self, request, code: str, repo_known: bool = False) -> None:
        if not repo_known or code != "EntryNotFound":
            self.unserved.append(f"{request.command} {request.path}")
        request.send_response(404)
        request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", f"{code}: {request.path}")
        request.send_header("Content-Length", "0")
        request.end_headers()


# -- repositories -------------------------------------------------------------------------------------
def write_dataset_repo(folder: Path, configs: dict, samples: Path) -> None:
    """configs: name -> (folder of its files, its splits, the samples folder in the dataset's schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = []
    for config, (files_folder, splits, sample) in configs.items():
        data_files = []
        for split in splits:
            source = "validation" if split == "test" else split  # a test split's rows: any rows of the schema
            rows = [json.loads(line) for line in (samples / sample / f"{source}.jsonl").open()]
            path = SPLIT_FILE.format(folder=files_folder, split=split)
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / path)
            data_files.append({"split": split, "path": f"{files_folder}/{split}-*"})
        entry = {"config_name": config, "data_files": data_files}
        if len(configs) == 1 and config != "default":
            entry["default"] = True  # as rajpurkar/squad's card marks its only config, plain_text
        card.append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("---\n" + json.dumps({"configs": card}) + "\n---\n")  # JSON is YAML


def opt_model(folder: Path) -> None:
    """As facebook/opt-* hold it: config.json, model.safetensors, GPT-2 BPE vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import OPTConfig, OPTForCausalLM

    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["The harbour was quiet and the boats were in."] * 4, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.save_model(str(folder))
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "add_bos_token": True, **specials}))
    config = OPTConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    OPTForCausalLM(config).save_pretrained(folder)


def llama_model(folder: Path) -> None:
    """As huggyllama/llama-* hold it: config.json, sharded safetensors with their index, tokenizer.json."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(["The harbour was quiet and the boats were in."] * 4, vocab_size=200,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **specials}))
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="20KB")
