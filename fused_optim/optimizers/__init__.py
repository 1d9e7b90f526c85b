"""One module per optimizer family: its class(es), reference math and kernel rule."""
