"""The `imgq` command line: the layer on top of imgq/, producer/, worker/ and model/."""
