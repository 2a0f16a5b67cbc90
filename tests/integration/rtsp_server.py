"""A real RTSP server for the camera tests: GStreamer's rtsp-server (Debian: gir1.2-gst-rtsp-server-1.0).

Run with the system Python, which has the GObject bindings: `/usr/bin/python3 rtsp_server.py PORT /cam`.
Serves a live 160x120 MJPEG test pattern at 15 frames/s on 127.0.0.1:PORT/cam until killed. (Debian 12's
ffmpeg cannot serve RTSP: its RTSP muxer only pushes to a server, it has no `-rtsp_flags listen`.)
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=160,height=120,framerate=15/1"
            " ! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26 )")

if __name__ == "__main__":
    Gst.init(None)
    port, mount = sys.argv[1], sys.argv[2]
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()
