"""The napari plugin: reader, writer, samples and dock widgets. The only package that imports Qt/napari."""
