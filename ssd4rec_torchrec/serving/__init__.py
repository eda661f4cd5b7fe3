"""Serving: a bundle loader, item indexes (exact / FAISS) and a micro-batching HTTP recommendation service.

The submodules are imported lazily by their users: ``index`` needs only torch (+ faiss for the FAISS
indexes), ``service`` needs FastAPI.
"""
