"""The token (and learned position) embedding table."""

from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding whose constructor only allocates: the weights come from a checkpoint or from the model's seeded
    reset_parameters, so nn.Embedding's own N(0, 1) draw would be thrown away. On the meta device that draw is also
    what first imports torch._dynamo (its meta kernel is a Python reference), about 1-2 s of a get_model."""

    def reset_parameters(self) -> None:
        pass
