"""Types FewStep passes between its own nodes."""
from comfy_api.latest import io

# A loader's detected family and reference settings (fewstep.families.FewStepSettings).
FewStepSettingsType = io.Custom("FEWSTEP_SETTINGS")
