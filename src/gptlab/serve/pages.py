"""The browser pages: the playground (/) and the training dashboard (/runs), with every asset served from the package.

    GET /                       the playground: prompt or chat against /v1/*, streamed, each token's probability
    GET /runs, /runs/NAME       the dashboard: the runs in the served folder, one run's curves, samples, eval, config
    GET /static/...             the pages' HTML, JS and CSS (gptlab/serve/static: nothing from another site)
    GET /api/runs               every run's state and latest numbers
    GET /api/runs/NAME          one run's
    GET /api/runs/NAME/metrics?since=N   metrics.csv rows from row N on (the page polls it while the run trains)
    GET /api/runs/NAME/samples  recent samples.md entries, newest first
    GET /api/runs/NAME/eval     eval.json / eval.md, where `gptlab eval` wrote them
    GET /api/runs/NAME/config   config.toml

The pages themselves are open; with --api-key the /api/* routes need the key like /v1/* (the app checks
every path under those prefixes), so the pages ask for it and send it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gptlab.serve import dashboard
from gptlab.serve.openai_api import ApiError

STATIC = Path(__file__).parent / "static"


def _no_run(name: str) -> ApiError:
    # raised, the app answers it in OpenAI's error shape, as /v1/* errors
    return ApiError(404, f"no run named {name!r} in the served folder (a run is a folder with config.toml or metrics.csv)",
                    code="run_not_found")


def install(app: FastAPI) -> None:
    """Add the pages, their JSON endpoints (/api/...) and the static assets to the app."""

    def root(request: Request) -> Path:
        return Path(request.app.state.registry.root)

    def only(request: Request) -> set[str] | None:
        # `gptlab serve runs/tiny` serves one run: its dashboard shows that run, not the others beside it
        single = getattr(request.app.state.registry, "single", None)
        return None if single is None else {Path(single).name}

    def page(name: str):
        # no-cache: a page from an older gptlab must not outlive an upgrade in the browser's cache
        return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def playground_page():
        return page("playground.html")

    @app.get("/runs", include_in_schema=False)
    @app.get("/runs/", include_in_schema=False)
    def dashboard_page():
        return page("dashboard.html")

    @app.get("/runs/{name}", include_in_schema=False)
    def run_page(name: str):
        return page("dashboard.html")  # the page reads the name from its URL and asks /api/runs/NAME

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    def api_runs(request: Request):
        folder = root(request)
        runs = []
        for name in dashboard.list_runs(folder, only(request)):
            try:
                runs.append(dashboard.run_summary(dashboard.find_run(folder, name, only(request))))
            except dashboard.UnknownRun:  # removed between listing and reading
                continue
        return {"object": "list", "root": str(folder), "data": runs}

    def run_route(suffix: str, read):
        def handler(name: str, request: Request):
            try:
                run_dir = dashboard.find_run(root(request), name, only(request))
            except dashboard.UnknownRun:
                raise _no_run(name) from None
            return read(run_dir)

        app.add_api_route(f"/api/runs/{{name}}{suffix}", handler, methods=["GET"], name=f"api_run{suffix.replace('/', '_')}")

    run_route("", dashboard.run_summary)
    run_route("/samples", lambda run_dir: {"data": dashboard.read_samples(run_dir)})
    run_route("/eval", dashboard.read_eval)
    run_route("/config", dashboard.read_config)

    @app.get("/api/runs/{name}/metrics")
    def api_metrics(name: str, request: Request, since: str = "0"):
        # read by hand, not as an int parameter: a bad value gets this API's error body, not the framework's
        if not (since.isascii() and since.isdigit()) or len(since) > 12:
            raise ApiError(400, f"since must be a row number (0 or more), not {since!r}", param="since", code="invalid_since")
        try:
            run_dir = dashboard.find_run(root(request), name, only(request))
        except dashboard.UnknownRun:
            raise _no_run(name) from None
        return dashboard.metrics_since(run_dir, int(since))
