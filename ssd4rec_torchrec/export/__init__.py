"""Serving bundles: ``writer.export_bundle`` (run dir -> bundle; needs torchrec) and ``bundle.load_bundle``
(bundle -> tables + user tower; torch, numpy and safetensors only).

Nothing is imported here, so ``import ssd4rec_torchrec.export.bundle`` stays free of torchrec and the model.
"""
