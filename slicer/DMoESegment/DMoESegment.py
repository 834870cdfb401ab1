"""3D Slicer scripted module: segment a volume with a dMoE model on a `dmoe serve` server.

Thin on purpose: everything that does not need Slicer (the wire format, geometry conversion, segment names and
colours, attribute choices, error messages) lives in napari-dmoe's torch-free client (napari_dmoe/client.py),
which is tested in napari-dmoe's CI. This file only moves data between Slicer nodes and that client; it is not run
in CI (Slicer cannot be installed there). See slicer/README.md.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)

SETTINGS = "DMoESegment"


def load_client():
    """napari-dmoe's client, without napari-dmoe installed in Slicer: the repository's own file when this module
    is used from a checkout (slicer/DMoESegment -> napari_dmoe/client.py), else a copy placed beside this file
    (dmoe_client.py), else an installed napari_dmoe."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, os.pardir, os.pardir, "napari_dmoe", "client.py"),
                 os.path.join(here, "dmoe_client.py")):
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("dmoe_client", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["dmoe_client"] = module  # dataclasses look their module up while it is being defined
            spec.loader.exec_module(module)
            return module
    import napari_dmoe.client as module  # pip-installed into Slicer's Python

    return module


class DMoESegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "dMoE Segment"
        parent.categories = ["Segmentation"]
        parent.contributors = ["napari-dmoe"]
        parent.helpText = ("Segment the selected volume on a dMoE server (`dmoe serve MODEL`), conditioned on the "
                           "patient attribute. One segment per class; optionally the routing maps as volumes.")
        parent.acknowledgementText = "dMoE: Distribution-aware Mixture of Experts (arXiv 2502.00619)."


class DMoESegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.client_module = load_client()
        self.logic = DMoESegmentLogic(self.client_module)
        self.models = []
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.volume = slicer.qMRMLNodeComboBox()
        self.volume.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volume.noneEnabled = False
        self.volume.setMRMLScene(slicer.mrmlScene)
        form.addRow("Volume:", self.volume)
        settings = qt.QSettings()
        self.url = qt.QLineEdit(settings.value(f"{SETTINGS}/url", "http://127.0.0.1:8765"))
        form.addRow("Server:", self.url)
        self.token = qt.QLineEdit()
        self.token.setEchoMode(qt.QLineEdit.Password)
        self.token.placeholderText = "needed when the server is on another computer"
        form.addRow("Token:", self.token)
        self.connect_button = qt.QPushButton("Connect")
        form.addRow(self.connect_button)
        self.model = qt.QComboBox()
        form.addRow("Model:", self.model)
        self.model_info = qt.QLabel()
        self.model_info.wordWrap = True
        form.addRow(self.model_info)
        self.attribute_form = qt.QFormLayout()
        form.addRow(self.attribute_form)
        self.attribute_combos = {}
        self.routing = qt.QCheckBox("Also make the routing maps (dominant expert, expert weights)")
        form.addRow(self.routing)
        self.force = qt.QCheckBox("Segment even if the volume does not fit the model's training data")
        form.addRow(self.force)
        self.segment_button = qt.QPushButton("Segment")
        self.segment_button.enabled = False
        form.addRow(self.segment_button)
        self.status = qt.QLabel()
        self.status.wordWrap = True
        form.addRow(self.status)
        self.layout.addStretch(1)
        self.connect_button.connect("clicked()", self.on_connect)
        self.model.connect("currentIndexChanged(int)", self.on_model)
        self.segment_button.connect("clicked()", self.on_segment)

    def on_connect(self):
        qt.QSettings().setValue(f"{SETTINGS}/url", self.url.text)
        try:
            self.models = self.logic.connect(self.url.text, self.token.text)
        except ValueError as err:  # ClientError / ServerError: one line from the client or the server
            self.models = []
            self.status.text = str(err)
        self.model.clear()
        for info in self.models:
            self.model.addItem(info["id"])
        if self.models:
            self.status.text = f"Connected: {len(self.models)} model(s)."
        self.segment_button.enabled = bool(self.models)

    def on_model(self, index):
        for combo in self.attribute_combos.values():
            combo.deleteLater()
        while self.attribute_form.rowCount():
            self.attribute_form.removeRow(0)
        self.attribute_combos = {}
        if not 0 <= index < len(self.models):
            self.model_info.text = ""
            return
        info = self.models[index]
        self.model_info.text = self.client_module.describe_model(info)
        for attribute in info["attributes"]:
            combo = qt.QComboBox()
            combo.addItems([self.client_module.UNKNOWN, *attribute["values"]])
            self.attribute_form.addRow(f"{attribute['name']}:", combo)
            self.attribute_combos[attribute["name"]] = combo

    def on_segment(self):
        volume = self.volume.currentNode()
        if volume is None or not 0 <= self.model.currentIndex < len(self.models):
            self.status.text = "Pick a volume and connect to a server first."
            return
        choices = {name: combo.currentText for name, combo in self.attribute_combos.items()}
        self.status.text = "Segmenting..."
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            result = self.logic.segment(volume, self.models[self.model.currentIndex], choices,
                                        routing=self.routing.checked, force=self.force.checked)
            self.status.text = self.logic.summary(result)
        except ValueError as err:
            self.status.text = str(err)
        finally:
            qt.QApplication.restoreOverrideCursor()


class DMoESegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer nodes <-> the client. Blocking: the request runs in Slicer's main thread (a cursor shows it)."""

    def __init__(self, client_module):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client_module = client_module
        self.client = None

    def connect(self, url, token):
        self.client = self.client_module.Client(url, token or None)
        return self.client.list_models()

    def segment(self, volume, info, choices, routing=False, force=False):
        c = self.client_module
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijk_to_ras = [[matrix.GetElement(r, col) for col in range(4)] for r in range(4)]
        spacing, origin, direction = c.geometry_from_ijk_to_ras(ijk_to_ras)
        array = slicer.util.arrayFromVolume(volume)  # (k, j, i): the client's (z, y, x)
        result = self.client.segment(info["id"], array, spacing=spacing, origin=origin, direction=direction,
                                     attribute=c.attribute_request(choices), routing=routing,
                                     modality=_modality(volume), force=force)
        name = f"{volume.GetName()} dMoE {info['id']}"
        self.add_segmentation(volume, result, name)
        if routing and result.dominant_expert is not None:
            self.add_routing(volume, result, name)
        return result

    def add_segmentation(self, volume, result, name):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation = node.GetSegmentation()
        for value, segment_name, color in self.client_module.segment_table(result.class_names):
            segment_id = segmentation.AddEmptySegment(f"dmoe_{value}", segment_name, list(color))
            mask = (result.labels == value).astype(np.uint8)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segment_id, volume)
        return node

    def add_routing(self, volume, result, name):
        dominant = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} dominant expert")
        dominant.CopyOrientation(volume)
        slicer.util.updateVolumeFromArray(dominant, result.dominant_expert.astype(np.uint8))
        weights = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", f"{name} expert weights")
        weights.CopyOrientation(volume)
        # [experts, k, j, i] -> [k, j, i, experts]: one component per expert
        slicer.util.updateVolumeFromArray(weights, np.moveaxis(result.routing["mean"], 0, -1).astype(np.float32))
        return dominant, weights

    @staticmethod
    def summary(result):
        used = result.attribute if isinstance(result.attribute, str) else ", ".join(
            f"{k}={v}" for k, v in (result.attribute or {}).items())
        seconds = sum(result.timings.values())
        notes = "; ".join(result.warnings)
        return f"Done on {result.device} in {seconds:.1f} s ({used})" + (f". Note: {notes}" if notes else "")


def _modality(volume):
    """DICOM Modality of the volume's first instance, when it came from Slicer's DICOM database."""
    uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or slicer.dicomDatabase is None:
        return None
    path = slicer.dicomDatabase.fileForInstance(uids[0])
    return (slicer.dicomDatabase.fileValue(path, "0008,0060") or None) if path else None
