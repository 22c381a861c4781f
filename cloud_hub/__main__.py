from cloud_hub.cli.app import app

app(prog_name="cloud-hub")
