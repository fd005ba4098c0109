"""The crdt-merge HTTP server: a FastAPI app over one replica directory (specs/http.md).

``server.app.create_app(replica_dir, settings)`` builds the app; ``crdt-merge serve`` (or
:func:`server.main.serve`) runs it under uvicorn. The server uses crdt_merge's public API;
crdt_merge never imports it.
"""
