<?php
/**
 * Command-line example of the IntakeAdmin class.
 *
 *   INTAKE_ADMIN_URL=http://127.0.0.1:8001 INTAKE_ADMIN_TOKEN=oia_... php intake-admin.php recent [N]
 *   ... php intake-admin.php study SITE STUDY_UID
 *   ... php intake-admin.php quarantine
 *   ... php intake-admin.php retry UPLOAD_ID
 */

declare(strict_types=1);

require __DIR__ . '/IntakeAdmin.php';

$api = new IntakeAdmin(getenv('INTAKE_ADMIN_URL') ?: 'http://127.0.0.1:8001', (string) getenv('INTAKE_ADMIN_TOKEN'));
$command = $argv[1] ?? 'recent';

try {
    switch ($command) {
        case 'recent':
            foreach ($api->recentUploads((int) ($argv[2] ?? 20)) as $u) {
                printf("%d\t%s\t%s\t%s\t%s\t%s\n", $u['id'], $u['received_at'], $u['site'],
                    $u['state'], $u['study_instance_uid'] ?? '-', $u['reason'] ?? '');
            }
            break;
        case 'study':
            $s = $api->study($argv[2], $argv[3]);
            printf("study %s of %s: %d instances in %d series, %d forwarded, %d queued, %d quarantined, quiet: %s\n",
                $s['study_instance_uid'], $s['site'], $s['instances'], $s['series'],
                $s['states']['forwarded'] ?? 0, $s['states']['queued'] ?? 0,
                $s['states']['quarantined'] ?? 0, $s['quiet'] ? 'yes' : 'no');
            foreach ($s['series_list'] as $series) {
                printf("  series %s: %d instances\n", $series['series_instance_uid'], $series['instances']);
            }
            break;
        case 'quarantine':
            foreach ($api->quarantined() as $u) {
                printf("%d\t%s\t%s\t%s\n", $u['id'], $u['site'], $u['reason'], $u['detail'] ?? '');
            }
            break;
        case 'retry':
            $r = $api->retry((int) $argv[2]);
            printf("upload %d is now %s\n", $r['id'], $r['state']);
            break;
        default:
            fwrite(STDERR, "usage: intake-admin.php recent [N] | study SITE UID | quarantine | retry ID\n");
            exit(2);
    }
} catch (IntakeAdminError $e) {
    fwrite(STDERR, $e->getMessage() . "\n");
    exit(1);
}
