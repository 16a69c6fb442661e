from shared.errors import NotFound


class CampaignNotFound(NotFound):
    detail = "Campaign not found"
