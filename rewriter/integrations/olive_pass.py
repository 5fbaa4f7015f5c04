"""The FlashNorm pass for Olive workflows (olive-ai ≥ 0.13: `pip install 'flashnorm-onnx[olive]'`).

Olive imports this module through a package config that lists it
(`python -m rewriter.integrations.olive_config FILE`, then `olive run --package-config FILE`);
a workflow names the pass as

    "passes": {"flashnorm": {"type": "FlashNorm", "rotate_online": true}, "quantize": {...}}

It rewrites the ONNX model with rewrite_file — the CLI's rewrite, checked and written
atomically — into Olive's output path, and returns the written file as an ONNXModelHandler (a
folder plus file name where the weights went to a data file, as Olive's own ONNX passes do).
The report's summary rides along in the model's attributes under "flashnorm"
(olive_config.report_summary), so later passes and the workflow's output keep it."""

from __future__ import annotations

import logging
from pathlib import Path

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from rewriter.api import rewrite_file
from rewriter.errors import Unsupported
from rewriter.files import mentions_external_data
from rewriter.integrations.olive_config import PARAMS, external_data_name, report_summary, rewrite_options

logger = logging.getLogger(__name__)


class FlashNorm(Pass):
    """Fold the normalization gains into the following linears and defer 1/RMS (or fold only);
    optionally rotate the residual stream for a quantization pass that follows. Exact: a site
    whose rewrite cannot be proved is left as it is, and the report says why."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {name: PassConfigParam(type_=type_, default_value=default, description=description)
                for name, (type_, default, description) in PARAMS.items()}

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        src = Path(model.model_path)
        dst = Path(resolve_onnx_path(output_model_path, src.name))
        dst.parent.mkdir(parents=True, exist_ok=True)
        options = rewrite_options(config)
        report = rewrite_file(src, dst, external_data=external_data_name(config, dst.name),
                              require_norms=False, verify=bool(config.verify), **options)
        if report.found == 0:
            logger.warning("FlashNorm: no normalization in %s; the model is passed on unchanged", src)
        if (options["rotate"] or options["rotate_online"]) and not (report.rotation or {}).get("applied"):
            why = report.rotation or {}
            raise Unsupported(f"FlashNorm: the residual stream of {src} cannot be rotated: {why.get('reason', '?')}"
                              + (f" (at {why['at']})" if why.get("at") else ""))
        logger.info("FlashNorm: %d of %d norms rewritten (%s)%s", report.rewritten, report.found, report.mode,
                    f", residual stream rotated ({report.rotation['online']} writers online)" if report.rotation else "")
        attributes = {**(model.model_attributes or {}), "flashnorm": report_summary(report)}
        if mentions_external_data(dst):
            return ONNXModelHandler(model_path=str(dst.parent), onnx_file_name=dst.name,
                                    inference_settings=model.inference_settings, model_attributes=attributes)
        return ONNXModelHandler(model_path=str(dst), inference_settings=model.inference_settings,
                                model_attributes=attributes)
