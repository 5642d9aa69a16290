"""The one-stage CenterNet-FPN detector (Table 1, first row)."""
from detectron2.modeling import META_ARCH_REGISTRY, ProposalNetwork


@META_ARCH_REGISTRY.register()
class CenterNetDetector(ProposalNetwork):
    """
    Backbone + the CenterNet head as the whole detector: detectron2's ``ProposalNetwork`` (which
    preprocesses, runs the proposal generator and rescales its output to the input size) with the
    ``CenterNet`` generator in detection mode (``MODEL.CENTERNET.ONLY_PROPOSAL: False``), so its
    outputs are final detections and are returned as ``instances``.
    """

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        if self.training:
            return outputs
        return [{"instances": out["proposals"]} for out in outputs]
