; Inno Setup 6 script for Fluidity on Windows: a per-user install (no admin rights), a Start
; menu entry, an optional "start at login", and an uninstaller that removes all of it.
;
; Built by `python installer\build.py --target windows`, which runs:
;   ISCC.exe /DAppVersion=X.Y.Z /DSourceDir=<one-folder bundle> /DOutputDir=<folder> /DIconFile=<.ico> fluidity.iss

#ifndef AppVersion
  #error Pass /DAppVersion=X.Y.Z (installer\build.py does)
#endif
#ifndef SourceDir
  #error Pass /DSourceDir=<the PyInstaller one-folder bundle> (installer\build.py does)
#endif
#ifndef IconFile
  #error Pass /DIconFile=<fluidity.ico> (installer\build.py does)
#endif
#ifndef OutputDir
  #define OutputDir "."
#endif

#define AppName "Fluidity"
#define AppExe "fluidity.exe"
; The login item desktop\autostart.py writes and removes: the same key, value name and flag,
; so the tray's "Start at login" menu item and this installer manage one and the same entry.
#define RunKey "Software\Microsoft\Windows\CurrentVersion\Run"
#define RunValue "Fluidity"
#define BackgroundFlag "--background"

[Setup]
AppId={{A34A821E-8160-43D7-B941-C12E525BF3DC}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher={#AppName}
DefaultDirName={localappdata}\Programs\{#AppName}
DefaultGroupName={#AppName}
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir={#OutputDir}
OutputBaseFilename=Fluidity-{#AppVersion}-windows-setup
SetupIconFile={#IconFile}
UninstallDisplayIcon={app}\{#AppExe}
UninstallDisplayName={#AppName}
Compression=lzma2
SolidCompression=yes
WizardStyle=modern
CloseApplications=yes
RestartApplications=no

[Tasks]
Name: "startatlogin"; Description: "Start {#AppName} when I sign in"; Flags: unchecked

[Files]
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; Comment: "Personal on-demand tunnel"

[Registry]
Root: HKCU; Subkey: "{#RunKey}"; ValueType: string; ValueName: "{#RunValue}"; ValueData: "{code:AutostartCommand}"; Tasks: startatlogin; Flags: uninsdeletevalue

[Run]
Filename: "{app}\{#AppExe}"; Description: "Start {#AppName} now"; Flags: nowait postinstall skipifsilent

[UninstallRun]
Filename: "{sys}\taskkill.exe"; Parameters: "/F /IM {#AppExe}"; Flags: runhidden; RunOnceId: "StopFluidity"

[UninstallDelete]
Type: filesandordirs; Name: "{app}"

[Code]
// The command line desktop\autostart.py writes: subprocess.list2cmdline([exe, "--background"]),
// which quotes the path only when it contains a space, exactly like AddQuotes.
function AutostartCommand(Param: String): String;
begin
  Result := AddQuotes(ExpandConstant('{app}\{#AppExe}')) + ' {#BackgroundFlag}';
end;

// The tray may have turned "Start at login" on after installation (the Registry entry above
// only covers the install-time task), so the uninstaller always removes the value.
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
begin
  if CurUninstallStep = usPostUninstall then
    RegDeleteValue(HKEY_CURRENT_USER, '{#RunKey}', '{#RunValue}');
end;
