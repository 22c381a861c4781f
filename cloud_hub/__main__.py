from cloud_hub.cli import app

app(prog_name="cloud-hub")
