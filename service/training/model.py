"""FusionNet: a chest radiograph and a clinical vector fused in the middle of the network.

Intermediate fusion lets the image and the clinical data each be encoded in their own way and then weigh
each other per sample: a gate computed from both embeddings decides, feature by feature, how much to take
from each. The image branch also has a per-finding 1x1 projection of its last feature map, trained as an
auxiliary image-only classifier, whose per-location logits give the class-activation heatmap.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Halve the resolution, then refine: stride-2 conv, 3x3 conv, each with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImageEncoder(nn.Module):
    """[B, 1, 256, 256] -> the last feature map [B, C, 16, 16] (four halvings)."""

    def __init__(self, stem_channels: int = 8, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        # A single cheap stride-2 conv at full resolution: most of the compute of a CNN on 256x256 is
        # spent there, and one layer is enough to keep thin structures such as a pleural line.
        blocks: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(1, stem_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(inplace=True),
            )
        ]
        in_channels = stem_channels
        for out_channels in channels:
            blocks.append(_conv_block(in_channels, out_channels))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = in_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.blocks(image)


class FusionNet(nn.Module):
    """Image + clinical intermediate fusion with a gated layer and a multi-label head.

    Args:
        n_clinical: number of clinical features (the mask has as many).
        n_findings: number of findings (multi-label logits).
        embedding: width of both embeddings and of the fused vector.
    """

    def __init__(self, n_clinical: int = 10, n_findings: int = 5, embedding: int = 64) -> None:
        super().__init__()
        self.image_encoder = ImageEncoder()
        channels = self.image_encoder.out_channels
        # Per-finding projection of each location: its global average is the image-only logit (auxiliary
        # loss), its map is the CAM. Keeping both on one layer is what makes the heatmap explain the logit.
        self.cam = nn.Conv2d(channels, n_findings, 1)
        self.image_embedding = nn.Sequential(nn.Linear(channels, embedding), nn.ReLU(inplace=True))
        # Values and mask together: the network can tell "normal" (value 0 after z-scoring) from "missing".
        self.clinical_encoder = nn.Sequential(
            nn.Linear(2 * n_clinical, embedding),
            nn.ReLU(inplace=True),
            nn.Linear(embedding, embedding),
            nn.ReLU(inplace=True),
        )
        self.gate = nn.Linear(2 * embedding, embedding)
        self.head = nn.Sequential(
            nn.Linear(embedding + n_findings, embedding),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(embedding, n_findings),
        )

    def forward_with_aux(
        self, image: torch.Tensor, clinical: torch.Tensor, clinical_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused logits [B, F], image-only logits [B, F] and CAM logits [B, F, 16, 16]."""
        features = self.image_encoder(image)
        cam_logits = self.cam(features)
        image_logits = cam_logits.mean(dim=(2, 3))
        image_embedding = self.image_embedding(features.mean(dim=(2, 3)))
        clinical_embedding = self.clinical_encoder(torch.cat([clinical, clinical_mask], dim=1))
        gate = torch.sigmoid(self.gate(torch.cat([image_embedding, clinical_embedding], dim=1)))
        fused = gate * image_embedding + (1.0 - gate) * clinical_embedding
        # The image-only logits go into the head too, so the fused model starts from the image evidence.
        logits = self.head(torch.cat([fused, image_logits], dim=1))
        return logits, image_logits, cam_logits

    def forward(
        self, image: torch.Tensor, clinical: torch.Tensor, clinical_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, F] and heatmap [B, F, 16, 16] in [0, 1] (sigmoid of the CAM logits)."""
        logits, _, cam_logits = self.forward_with_aux(image, clinical, clinical_mask)
        return logits, torch.sigmoid(cam_logits)
