"""3D Slicer scripted module: segment a volume with a dMoE model on a `dmoe serve` server.

A thin shell: it reads nodes and writes nodes. Everything else (request building, geometry with parent transforms,
the background job with cancel, per-expert volumes, the segment table, error messages) is plain Python in
DMoESegmentLib/logic.py, tested in napari-dmoe's CI without Slicer (tests/test_slicer_logic.py). Slicer cannot be
installed there, so this file is checked for syntax and shape only; "Reload and Test" runs DMoESegmentTest
against a running server. See slicer/README.md.
"""
from __future__ import annotations

import os

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from DMoESegmentLib import logic as core

SETTINGS = "DMoESegment"
POLL_MS = 200


class DMoESegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "dMoE Segment"
        parent.categories = ["Segmentation"]
        parent.contributors = ["napari-dmoe"]
        parent.helpText = ("Segment the selected volume on a dMoE server (`dmoe serve MODEL`), conditioned on the "
                           "patient attribute. One segment per class; optionally the routing maps (the dominant "
                           "expert, and one volume per expert with its mean gate weight).")
        parent.acknowledgementText = "dMoE: Distribution-aware Mixture of Experts (arXiv 2502.00619)."


class DMoESegmentWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = DMoESegmentLogic()
        self.models, self.job, self.attribute_combos = [], None, {}
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.volume = slicer.qMRMLNodeComboBox()
        self.volume.nodeTypes = ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
        self.volume.noneEnabled = False
        self.volume.setMRMLScene(slicer.mrmlScene)
        form.addRow("Volume:", self.volume)
        self.url = qt.QLineEdit(qt.QSettings().value(f"{SETTINGS}/url", "http://127.0.0.1:8765"))
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
        self.routing = qt.QCheckBox("Also make the routing maps (dominant expert, one volume per expert)")
        form.addRow(self.routing)
        self.force = qt.QCheckBox("Segment even if the volume does not fit the model's training data")
        form.addRow(self.force)
        self.segment_button = qt.QPushButton("Segment")
        self.segment_button.enabled = False
        self.cancel_button = qt.QPushButton("Cancel")
        self.cancel_button.enabled = False
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        self.progress = qt.QProgressBar()
        self.progress.setRange(0, 0)  # the server sends no progress: a busy bar and the time waited
        self.progress.visible = False
        form.addRow(self.progress)
        self.status = qt.QLabel()
        self.status.wordWrap = True
        form.addRow(self.status)
        self.layout.addStretch(1)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.on_poll)
        self.connect_button.connect("clicked()", self.on_connect)
        self.model.connect("currentIndexChanged(int)", self.on_model)
        self.segment_button.connect("clicked()", self.on_segment)
        self.cancel_button.connect("clicked()", self.on_cancel)

    def cleanup(self):
        self.on_cancel()
        self.timer.stop()

    def on_connect(self):
        qt.QSettings().setValue(f"{SETTINGS}/url", self.url.text)
        try:
            self.models = core.list_models(self.url.text, self.token.text)
        except Exception as err:  # noqa: BLE001 - every failure in a dialog
            self.models = []
            self.show_error(err)
        self.model.clear()
        for info in self.models:
            self.model.addItem(info["id"])
        self.status.text = f"Connected: {len(self.models)} model(s)." if self.models else ""
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
        self.model_info.text = core.describe_model(info)
        for attribute in info["attributes"]:
            combo = qt.QComboBox()
            combo.addItems([core.unknown_value(), *attribute["values"]])
            self.attribute_form.addRow(f"{attribute['name']}:", combo)
            self.attribute_combos[attribute["name"]] = combo

    def on_segment(self):
        volume = self.volume.currentNode()
        if volume is None or not 0 <= self.model.currentIndex < len(self.models):
            self.status.text = "Pick a volume and connect to a server first."
            return
        choices = {name: combo.currentText for name, combo in self.attribute_combos.items()}
        try:
            self.job = self.logic.start(volume, self.url.text, self.token.text, self.models[self.model.currentIndex],
                                        choices, routing=self.routing.checked, force=self.force.checked)
        except Exception as err:  # noqa: BLE001
            self.show_error(err)
            return
        self.volume_node = volume
        self.set_running(True)
        self.timer.start()

    def on_cancel(self):
        if self.job is not None:
            self.job.cancel()

    def on_poll(self):
        job = self.job
        if job is None:
            return
        state = job.poll()
        self.status.text = job.progress_text()
        if state in ("running", "cancelling"):
            return
        self.timer.stop()
        self.set_running(False)
        self.job = None
        if state == "done":
            try:
                self.logic.add_results(self.volume_node, job)
                self.status.text = core.summary(job.result)
            except Exception as err:  # noqa: BLE001
                self.show_error(err)
        elif state == "failed":
            self.show_error(job.error)
        else:
            self.status.text = "Cancelled."

    def set_running(self, running):
        self.progress.visible = running
        self.cancel_button.enabled = running
        self.segment_button.enabled = not running and bool(self.models)
        self.connect_button.enabled = not running

    def show_error(self, err):
        text = core.error_text(err)
        self.status.text = text
        slicer.util.errorDisplay(text, windowTitle="dMoE Segment")


class DMoESegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer nodes <-> DMoESegmentLib.logic."""

    def volume_input(self, volume):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        parent = volume.GetParentTransformNode()
        parent_to_world = None
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise core.LogicError(f"volume {volume.GetName()!r} is under a non-linear transform; harden it "
                                      "(Data module: right-click the transform, Harden transform) first")
            to_world = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(to_world)
            parent_to_world = core.matrix_to_array(to_world.GetElement)
        return core.VolumeInput(array=slicer.util.arrayFromVolume(volume), ijk_to_ras=core.matrix_to_array(
            matrix.GetElement), parent_to_world=parent_to_world, name=volume.GetName(), modality=_modality(volume))

    def start(self, volume, url, token, info, choices, routing=False, force=False):
        request = core.build_request(self.volume_input(volume))
        return core.SegmentJob(url, token, info["id"], request, attribute=core.attribute_request(choices),
                               routing=routing, force=force).start()

    def add_results(self, volume, job):
        """Nodes on the volume's own grid, under its parent transform, so they sit where the volume is shown."""
        out = core.outputs(job.result, job.request)
        names = core.result_names(volume.GetName(), job.model_id)
        parent_id = volume.GetTransformNodeID()
        nodes = [self.add_segmentation(volume, out, names["segmentation"])]
        if out.dominant is not None:
            nodes.append(self.add_dominant(volume, out, names["dominant"]))
            nodes += [self.add_expert(volume, name, array, out) for name, array in out.experts]
        for node in nodes:
            node.SetAndObserveTransformNodeID(parent_id)
        return nodes

    def add_segmentation(self, volume, out, name):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation = node.GetSegmentation()
        for value, segment_name, color in out.segments:
            segment_id = segmentation.AddEmptySegment(f"dmoe_{value}", segment_name, list(color))
            mask = (out.labels == value).astype(np.uint8)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segment_id, volume)
        return node

    def add_dominant(self, volume, out, name):
        colors = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name} colours")
        colors.SetTypeToUser()
        colors.SetNumberOfColors(len(out.expert_colors) + 1)
        colors.SetColor(0, "none", 0.0, 0.0, 0.0, 0.0)
        for value, label, (r, g, b) in out.expert_colors:
            colors.SetColor(value, label, r, g, b, 1.0)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        node.CopyOrientation(volume)
        slicer.util.updateVolumeFromArray(node, out.dominant)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        return node

    def add_expert(self, volume, name, array, out):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CopyOrientation(volume)
        slicer.util.updateVolumeFromArray(node, array)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        colormap = out.colormap if slicer.mrmlScene.GetNodeByID(out.colormap) else "vtkMRMLColorTableNodeGrey"
        display.SetAndObserveColorNodeID(colormap)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(*out.window)
        return node


def _modality(volume):
    """DICOM Modality of the volume's first instance, when it came from Slicer's DICOM database."""
    uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or slicer.dicomDatabase is None:
        return None
    path = slicer.dicomDatabase.fileForInstance(uids[0])
    return (slicer.dicomDatabase.fileValue(path, "0008,0060") or None) if path else None


class DMoESegmentTest(ScriptedLoadableModuleTest):
    """Reload and Test: segments a synthetic volume, under a parent transform, on a running server.

    Start one first, e.g. `dmoe serve napari_dmoe/assets/models/prostate-dmoe.safetensors` (the URL in
    $DMOE_TEST_SERVER, else the module's saved server address; $DMOE_TEST_TOKEN when it needs one)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_segment_synthetic_volume()

    def test_segment_synthetic_volume(self):
        url = os.environ.get("DMOE_TEST_SERVER") or qt.QSettings().value(f"{SETTINGS}/url", "http://127.0.0.1:8765")
        token = os.environ.get("DMOE_TEST_TOKEN")
        self.delayDisplay(f"Connecting to {url}")
        models = core.list_models(url, token)
        info = next((m for m in models if m["spatial_dims"] == 3), None)
        self.assertIsNotNone(info, f"the server at {url} has no 3D model")
        zz, yy, xx = np.mgrid[:48, :64, :64]
        blob = ((zz - 24) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2) * 400.0 - 100.0
        volume = slicer.util.addVolumeFromArray(blob.astype(np.float32), name="dmoe test volume")
        volume.SetSpacing(3.0, 3.0, 3.0)
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "dmoe test shift")
        shift = vtk.vtkMatrix4x4()
        shift.SetElement(0, 3, 25.0)
        transform.SetMatrixTransformToParent(shift)
        volume.SetAndObserveTransformNodeID(transform.GetID())
        logic = DMoESegmentLogic()
        job = logic.start(volume, url, token, info, {}, routing=True, force=True)
        while job.poll() == "running":
            slicer.app.processEvents()
            job.wait(0.1)
        self.assertEqual(job.poll(), "done", core.error_text(job.error) if job.error else job.poll())
        nodes = logic.add_results(volume, job)
        self.assertEqual(nodes[0].GetSegmentation().GetNumberOfSegments(), len(info["class_names"]) - 1)
        dominant = slicer.util.arrayFromVolume(nodes[1])
        self.assertGreaterEqual(int(dominant.min()), 1)  # expert 0 is label 1, never transparent
        self.assertEqual(len(nodes) - 2, info["n_experts"])
        for node in nodes:
            self.assertEqual(node.GetTransformNodeID(), transform.GetID())
        self.delayDisplay("dMoE Segment test passed")
