"""A tiny three-level CNN backbone for fast model tests (it follows the Backbone protocol by hand)."""
import torch
import torch.nn as nn


class TinyBackbone(nn.Module):
    name = "tiny"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    finetunable = True

    def __init__(self, channels=(8, 16, 32), strides=(4, 8, 16)):
        super().__init__()
        self.channels, self.strides, self.levels = tuple(channels), tuple(strides), (1, 2, 3)
        layers, cin, s = [], 3, 1
        for c, st in zip(channels, strides):
            f = st // s
            layers.append(nn.Sequential(nn.Conv2d(cin, c, 3, f, 1), nn.BatchNorm2d(c), nn.ReLU()))
            cin, s = c, st
        self.stages = nn.ModuleList(layers)

    def forward(self, x):
        outs = []
        for st in self.stages:
            x = st(x)
            outs.append(x)
        return outs

    def config(self):
        return {"name": self.name, "channels": list(self.channels), "strides": list(self.strides)}
