"""Helpers shared by the hostile-input tests (one-line errors, tiny adapters, a local download mirror)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path


def one_error(rc: int, err: str, code: int, *needles: str) -> None:
    """Exactly one ``nucseg: error:`` line (no traceback) and the documented exit code."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == code, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("nucseg: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def one_error_line(rc: int, err: str, code: int, needle: str) -> None:
    """Exactly one ``nucseg: error:`` line containing ``needle`` (warnings may stand beside it), no traceback, and
    the documented exit code."""
    errors = [line for line in err.strip().splitlines() if line.startswith("nucseg: error: ")]
    assert rc == code, err
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def tiny_adapter(path: Path, checkpoint: Path | None = None, size: int = 64) -> Path:
    """A vit_tiny LoRA adapter (random base, or ``checkpoint``), its factors perturbed so merging changes weights."""
    import torch

    from nucseg.model.adapter import save_adapter
    from nucseg.model.lora import MethodConfig, apply_method
    from nucseg.model.sam import load_sam

    model, fp = load_sam("vit_tiny", checkpoint, img_size=size, seed=0)
    method = MethodConfig(rank=2)
    apply_method(model, method)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"base": {"model": "vit_tiny", "fingerprint": fp, "init_seed": 0,
                     "checkpoint_sha256": None if checkpoint is None else fp,
                     "checkpoint_name": None if checkpoint is None else Path(checkpoint).name},
            "input_size": size, "mpp": 0.5, "parameters": {"trainable": 1, "total": 2},
            "data": {"tiles": 1, "images": 1, "nuclei": 1, "organs": ["x"], "tile_size": size}}
    return save_adapter(path, model, method, meta)


class Mirror:
    """A local HTTP mirror on 127.0.0.1 serving ``files`` (name -> bytes); ``short`` names are sent cut short
    (their Content-Length announces the whole file, half of it arrives)."""

    def __init__(self, files: dict[str, bytes], short: set[str] = frozenset()):
        self.files, self.short, self.requests = dict(files), set(short), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.short:
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def no_proxy(monkeypatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
