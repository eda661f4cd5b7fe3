"""Exporting a trained run: ``writer.export_bundle`` (run dir -> serving bundle; needs torchrec) and the
traceable user tower (``tower``). The bundle format and its reader are :mod:`ssd4rec_torchrec.bundle`.

Nothing is imported here, so importing a submodule does not pull in the others.
"""
